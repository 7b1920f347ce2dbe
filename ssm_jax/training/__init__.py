"""Training: the data-parallel step (``step``), the loop for one run or a group
(``loop``), model groups trained as one program (``groups``) and the TensorBoard writer
(``tb_writer``).

May import: ``core``, ``runtime``, ``data``, ``method``, ``config``, ``runs``.
"""
