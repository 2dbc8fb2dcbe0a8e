"""``python -m fedsplit.deploy ...`` = ``fedsplit-deploy ...``."""

from fedsplit.deploy.cli import main

main()
