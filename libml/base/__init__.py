"""The machine and the files: errors, safe writes, disk checks, command lines, the platform set-up and the console."""
