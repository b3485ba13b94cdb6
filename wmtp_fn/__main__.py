from wmtp_fn.run import main

main()
