from xdpturn.cli import main

raise SystemExit(main())
