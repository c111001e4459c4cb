from sdpo_engine.cli import main

raise SystemExit(main())
