#!/usr/bin/env python3
"""Radix cluster agent. `python main.py --help` lists every setting."""

import sys

from cluster_agent.app import main

if __name__ == "__main__":
    sys.exit(main())
