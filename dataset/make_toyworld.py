"""Write the toy world as a SAGE-format data set: ``python dataset/make_toyworld.py --out DIR --seed S``.

Thin wrapper around ``psa_adapter.toyworld.sage`` (same as ``python -m psa_adapter.toyworld make-data``).
"""

import argparse

from psa_adapter.toyworld.sage import add_make_data_args, make_data_from_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_make_data_args(parser)
    make_data_from_args(parser.parse_args())
