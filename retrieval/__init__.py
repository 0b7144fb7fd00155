"""radalign retrieval stage: FAISS similar-case search with explanations (docs/retrieval.md).

    from radalign.retrieval.search import Retriever
    res = Retriever.load("runs/demo/retrieval/index").search(study_id="50000123", k=5)

Modules: `index` (choose / build / tune FAISS indexes), `store` (the index folder), `build` (shards ->
index), `search` (Retriever, filters, explanation), `render` (Markdown / HTML), `evaluate` (Recall@K,
label precision@K with chance), `classify` (the index as a k-NN classifier beside zero-shot), `cli`.
"""
