from wmtp_fn.run import main

raise SystemExit(main())
