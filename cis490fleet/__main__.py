from cis490fleet import cli

raise SystemExit(cli.main())
