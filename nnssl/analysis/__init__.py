"""Post-hoc analysis of trained models: CKA feature reuse (``nnssl_cka``) and the study report (``nnssl_report``)."""
