from .dataset import main

raise SystemExit(main())
