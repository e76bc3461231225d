"""The ``pacsai`` verbs: one module per verb, named after it (``pacsai report`` → :mod:`pacsai.commands.report`).

Each module has ``register(subparsers)``, which adds the verb's parser and sets ``func`` (taking the parsed
``argparse.Namespace`` and returning an exit code). A verb module parses arguments and prints; the work is done
by the domain modules it calls (:mod:`pacsai.pacs`, :mod:`pacsai.report`, :mod:`pacsai.demo`, ...), imported
inside ``func`` so that ``pacsai --help`` stays fast. :mod:`pacsai.cli` finds the verbs by listing this package.
"""
