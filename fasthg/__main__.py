from fasthg.cli import main

raise SystemExit(main())
