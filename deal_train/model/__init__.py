"""Loading models and tokenizers, published architectures, precision and quantisation, the answer-token loss."""
