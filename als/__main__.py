from als.cli import main

raise SystemExit(main())
