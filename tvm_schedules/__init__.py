"""Hand-written TensorIR schedules for operators the default TVM lowering handles poorly."""
