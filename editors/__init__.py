"""The mathematics of engramflow in plain torch: no Prefect, no Ray."""
