from apexlens.ui.cli import main

raise SystemExit(main())
