from breakhis_tl.cli import main

raise SystemExit(main())
