"""Python modules generated from ``../proto/grpc_predict_v2.proto`` by ``make proto``; never edited by hand."""
