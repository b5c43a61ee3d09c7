"""Small files shipped with the package (the synthetic data set's tokenizer) and the code that builds them."""
