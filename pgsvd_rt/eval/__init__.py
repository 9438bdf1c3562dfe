from pgsvd_rt.eval.perplexity import perplexity
from pgsvd_rt.eval.zeroshot import evaluate_tasks

__all__ = ["evaluate_tasks", "perplexity"]
