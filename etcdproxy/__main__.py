"""``python -m etcdproxy`` runs the supervisor CLI."""

from etcdproxy.cli import main

if __name__ == "__main__":
    main()
