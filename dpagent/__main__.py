from dpagent.cli import main

raise SystemExit(main())
