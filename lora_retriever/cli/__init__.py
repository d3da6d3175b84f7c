"""Entry points: thin front ends that parse flags into a typed config and call the library.

Each module has ``build_parser()`` and ``main(argv=None) -> int`` (the console script of the same purpose):

* ``infer``: ``lora-retriever-infer`` / ``infer_lora_retriever.py`` -> ``pipeline.run_inference``
* ``train``: ``lora-retriever-train`` / ``train.py`` -> ``training.train``
* ``merge``: ``lora-retriever-merge`` / ``python -m lora_retriever.merge`` -> ``merge.merge_adapters``
* ``eval``: ``lora-retriever-eval`` / ``python -m lora_retriever.eval`` -> ``eval.run``
* ``demo``: ``lora-retriever-demo`` / ``python -m lora_retriever.demo`` -> ``demo.run_demo``
* ``embed_pool``: ``lora-retriever-embed-pool`` / ``python -m lora_retriever.embed_pool`` -> ``embed_pool``
* ``serve``: ``lora-retriever-serve`` / ``python -m lora_retriever.service`` -> ``service.server.serve``

Flags come from the configs' field metadata (``args``); every command runs inside ``errors.run_cli``.
"""
