"""The solvers behind the updates and the reconstruction: pure tensor maths, no hooks, no state."""
