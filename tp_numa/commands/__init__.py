"""`tp-numa` subcommands: one module per command with add_arguments(parser) and run(args)."""
