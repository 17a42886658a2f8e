"""Model families (gpt, bert, t5), each a package that declares its ``SPEC`` (a
:class:`toolkit.registry.ModelSpec`), built from shared blocks in ``toolkit.models.common``;
``toolkit.models.build`` builds any registered family's model."""
