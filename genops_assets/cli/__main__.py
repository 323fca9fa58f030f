from genops_assets.cli.main import main

raise SystemExit(main())
