from ai_reference.main import main

main()
