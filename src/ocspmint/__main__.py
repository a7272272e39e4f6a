from ocspmint.cli import main

raise SystemExit(main())
