from dimse_gateway.main import main

main()
