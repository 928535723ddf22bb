"""Quality test bed: a small trained Wan-structured text-to-video model (see sparge.testbed)."""
