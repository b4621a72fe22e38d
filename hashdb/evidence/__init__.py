"""Evidence for one match: align and verify a pair (``compare``), order a cluster into a derivation tree
(``derivation_tree``) and write it all as one self-contained HTML page (``html_report``); docs/evidence.md.

numpy only on import; scipy (the linear assignment) and matplotlib (the plots) are imported where used and
come with the ``report`` extra.
"""

from .compare import compare, verdict
from .nulldist import distance_null, false_match_rate

__all__ = ["compare", "verdict", "distance_null", "false_match_rate"]
