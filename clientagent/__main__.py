from clientagent.cli import main

raise SystemExit(main())
