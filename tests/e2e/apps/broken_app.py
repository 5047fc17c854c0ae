raise RuntimeError("this app cannot start")
