"""Dataset-building tools (run once, offline; nothing in training imports them):

    humaneval   python -m wmtp_fn.data.build.humaneval: the embedded HumanEval-derived set
    mutations   find_mutations, select_mutants: source-splicing program mutations
    bpe         train_bpe, save_hf_tokenizer: the embedded byte-level BPE tokenizer
"""
