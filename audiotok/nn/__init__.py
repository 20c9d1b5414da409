"""The network: its configuration, building blocks (Snake, weight-normalized convolutions), residual
vector quantizer, the Improved RVQGAN generator, and the spectral distances it is trained and judged by."""
