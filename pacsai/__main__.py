from pacsai.cli import main

raise SystemExit(main())
