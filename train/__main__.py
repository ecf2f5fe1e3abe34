from segengine.train.train import main

raise SystemExit(main())
