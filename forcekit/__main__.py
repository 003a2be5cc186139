from forcekit.cli import main

raise SystemExit(main())
