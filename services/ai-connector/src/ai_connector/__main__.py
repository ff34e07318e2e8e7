from ai_connector.main import main

main()
