from potion.cli import main

raise SystemExit(main())
