"""Physical constants in polarjax units: energy eV, length Å, charge e, time fs.

One source of truth: every Coulomb prefactor in the package derives from
``HALF_INV_EPS0`` so that open-boundary, periodic and self terms agree exactly.
"""

import math

#: 1 / (2 eps0) in eV·Å/e² (the latent-Ewald convention, taken exactly as written).
HALF_INV_EPS0 = 90.4756

#: 1 / (4 pi eps0) in eV·Å/e², derived from HALF_INV_EPS0 (= 14.399639...).
COULOMB = HALF_INV_EPS0 / (2.0 * math.pi)

#: Default Gaussian smearing width sigma (Å) and k-space resolution dl (Å).
DEFAULT_SIGMA = 1.0
DEFAULT_DL = 2.0
