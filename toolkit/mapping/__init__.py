"""The state-dict mapping language the model families write their conversions in: template tables
of rules (external name ↔ our name, ``{}`` = layer index), registered tensor transforms, the
Hugging Face target and family adapter records (:mod:`toolkit.mapping.tables`), and the legacy
Megatron-LM layer rules every family shares (:mod:`toolkit.mapping.megatron`). It sits below the
families: ``toolkit.convert`` runs the tables, ``models/<family>/hf.py`` writes them."""
