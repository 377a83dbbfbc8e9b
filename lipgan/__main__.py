from lipgan.cli import main

raise SystemExit(main())
