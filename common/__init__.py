"""What both sides of the federation import: data, model, privacy, protocol; no Flower.

Two things here apply to every process that imports the project, before any
library is loaded:

- warnings that a user cannot act on are silenced (``torch.jit.script``'s
  deprecation, raised by a dependency at import; Ray's note on accelerator
  variables, about a default this project never relies on);
- Opacus calls ``logging.basicConfig`` when it is imported, which puts a handler
  on the root logger; Flower's logger, which has its own handler, would then
  print every line twice, so it stops propagating to the root.
"""

import logging
import warnings

warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
logging.getLogger("flwr").propagate = False
