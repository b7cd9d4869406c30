"""RepMLPNet (Ding et al., CVPR'22): the RepMLP block and Locality Injection of whole networks.

- `repmlp`: RepMLP block, RepMLPNet-T224..L256 and small variants, `reparameterize` (Locality Injection),
  official PyTorch layout. The conv -> FC algebra itself is generic (`repjax.nn.locality`), since the
  depthwise convolution's `matmul` algorithm uses it too.
"""

from repjax.projects.repmlp import repmlp  # noqa: F401  (register)
