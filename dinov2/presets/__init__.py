"""Published register-neuron lists for DINOv2, shipped as JSON neuron files (registered in ``..loader``)."""
