from aecurves.cli import main

raise SystemExit(main())
