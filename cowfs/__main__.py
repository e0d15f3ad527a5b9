from cowfs.cli import main

raise SystemExit(main())
