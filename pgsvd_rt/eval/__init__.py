from pgsvd_rt.eval.perplexity import perplexity

__all__ = ["perplexity"]
