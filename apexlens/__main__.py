from apexlens.cli import main

raise SystemExit(main())
